"""``scripts/demo``: the whole loop on synthetic studies, in one command.

Synthetic CT and MR subjects (:mod:`sijnode.synth`) train quick checkpoints (``sijnode
train ... --quick``, cached under ``demo/cache``), which are imported (``sijnode models
import``); a node with an embedded worker and a local PACS (Orthanc, or DCMTK ``storescp``)
are started; held-out studies go from the PACS to the node and the results come back.
What happened is printed (:mod:`sijnode.demo.show`) and drawn (``demo/overview.png``).

Modules: :mod:`~sijnode.demo.processes` (started processes, stopped on exit and Ctrl-C),
:mod:`~sijnode.demo.models` (synthetic data and cached training),
:mod:`~sijnode.demo.pacs` (Orthanc or storescp), :mod:`~sijnode.demo.run` (the loop),
:mod:`~sijnode.demo.show` (tables, SR tree, overview picture).
"""
