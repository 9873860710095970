"""Model code: the DeiT student (:mod:`~distill.models.deit`, its config in :mod:`~distill.models.deit_config`,
fitting weights trained elsewhere in :mod:`~distill.models.deit_pretrained`). The CNN teachers are
:mod:`distill.teachers`. Nothing is imported here: each stage imports only the model code it runs.
"""
