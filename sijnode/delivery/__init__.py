"""Returning results to PACS: C-STORE, STOW-RS and a triage webhook, with retries, a
dead-letter list, Storage Commitment and shadow mode (docs/delivery.md).

Destinations sit behind one protocol (:class:`sijnode.delivery.targets.Target`), the
model of mercure's target handlers; :class:`sijnode.delivery.scheduler.DeliveryScheduler`
is the loop that sends what is due, with its schedule in the audit (``deliveries``).
"""
