"""sijnode: a DICOM node that triages sacroiliitis with AI (research use only).

The subpackages follow the pipeline: ``daemon`` receives, ``workers`` queue and run,
``models`` classify, ``reports`` build the DICOM results, ``db`` records everything.
"""

__version__ = "0.1.0"

RESEARCH_USE_LABEL = "AI output, research use only, not for diagnostic use"
