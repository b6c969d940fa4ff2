"""Classify: model specs and checkpoints, series loading, the CT and MR pipelines.

``spec`` and ``checkpoint`` (no torch needed to read or verify a checkpoint), ``registry``
(pipelines by name; ``StudyInput``), ``series``, ``preprocess``, ``roi``, ``localizer``,
``aggregate``, ``cam``, ``runtime``, ``architectures``, and the pipelines ``ct`` and
``mr``; ``result`` is the contract with the record and report stages. docs/models.md.
"""
