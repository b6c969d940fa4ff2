"""Report: the DICOM objects of a result, built with highdicom (docs/reports.md).

- ``codes``: every coded concept, verified in PS3.16 (DICOM-OUTPUTS.md);
- ``uids``: deterministic output UIDs per job;
- ``sr``: the TID 1500 Measurement Report, encodable as SR 88.33, 88.22 or 88.34;
- ``sc``: Grad-CAM secondary captures; ``kos``: the optional Key Object Selection;
- ``build``: ``build_outputs`` → ``ReportBundle`` (the delivery in ``sijnode.delivery``
  sends it).
"""
