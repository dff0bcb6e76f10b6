"""One module per backbone family, each defining `SPEC`, an `apex_dist.models.spec.ModelSpec`.

`apex_dist.models.spec.model_specs()` imports every module here; adding a backbone is adding
its model file to `apex_dist/models/` and its spec file here (docs/models.md, "Adding a
backbone").
"""
