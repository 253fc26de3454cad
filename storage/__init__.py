"""Records (SQLModel) and objects (MinIO/S3 or a local folder) of dcmflow.

``storage`` imports none of dcmflow's other packages and knows nothing of Prefect.
"""
