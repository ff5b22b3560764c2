"""The toolkit above the pipelines: ``lmforge env`` (is this machine ready), training presets
(``--preset``, ``lmforge presets``) and dry runs (``--dry_run``: what a run will do and need)."""
