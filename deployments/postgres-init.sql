-- Run once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
-- POSTGRES_DB creates dcmflow's records database; this creates the Prefect server's, owned by
-- the same role (POSTGRES_USER). Two databases on one server: back up both.
CREATE DATABASE prefect;
