"""PEFT's own tuner tests (``tests/test_custom_models.py`` of the installed peft's sdist) run against
ortho_adapters' methods, each test paired with the same test on a built-in control tuner (DeLoRA).

``cases``: our parametrizations, mirrored from the control's. ``patch``: the patched copy of PEFT's
tests. ``plugin``: pytest selection of the paired tests. ``pairing`` / ``junit`` / ``classify``:
turning a junit XML into per-method buckets. ``not_applicable``: the explicit exemptions.
``report``: markdown and JSON. ``runner``: all of it in one call (``scripts/peft_conformance.py``).
Nothing here is imported by ``ortho_adapters`` itself.
"""
