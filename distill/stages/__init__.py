"""The pipeline's stages, one module each: ``distill/stages/<name>.py`` with one ``run(params, paths, tracker)``.

A stage reads its inputs from files and writes its outputs to files, so DVC can version them and Prefect
flows only pass paths. It receives its parameters as a :class:`distill.config.ParamsView` that allows only the
keys ``dvc.yaml`` declares for it, so DVC reruns it whenever something it reads changes. Nothing here knows
about Prefect, DVC or a command line: ``flows/`` wraps the stages, and :mod:`distill.stages.runner` runs one
by name. Adding a stage is ``dvc.yaml`` plus one new module here.
"""
