"""dcmflow's Prefect deployments: ``prefect.yaml`` (the declaration) and the loader that serves it."""
