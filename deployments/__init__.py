"""Deployment-as-code: prefect.yaml (deployments, schedules, triggers) and automations.yaml."""
