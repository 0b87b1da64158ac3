"""The layer every wing and stage stands on: params, tracking, lineage, atomic io, the stage runner, errors."""
