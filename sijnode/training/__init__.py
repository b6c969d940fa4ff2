"""Training tools: turn a site's labelled studies into the checkpoints the node runs.

They reuse ``sijnode.models`` for every transform (preprocessing, ROI rule, aggregation),
so a model is trained on exactly what the node will feed it. Nothing is downloaded:
pretrained weights come from a local file (``--pretrained PATH``).
"""
