"""Deployment assets: Prefect deployments, schedules and triggers (prefect.yaml), automations
(automations.yaml, applied by `python -m deployments.automations apply`) and IAM policies per role (iam/)."""
