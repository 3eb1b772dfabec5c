"""Ingest benchmark: haltless vs a FastAPI/pydantic/asyncpg baseline. See README.md."""
