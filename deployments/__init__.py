"""Deployment assets: Prefect deployments (prefect.yaml) and IAM policies per role (iam/)."""
