"""The lifecycle flows, one module each: orchestration only, effects live in tasks/."""
