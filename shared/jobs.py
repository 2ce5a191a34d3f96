"""Job names and payloads: the contract between the gateway (enqueuer) and the worker (arq)."""
from __future__ import annotations

# process_postback(ctx, postback_id: int) — attribute one stored raw postback.
PROCESS_POSTBACK = "process_postback"


def postback_job_id(postback_id: int) -> str:
    """arq job id: enqueuing the same postback twice runs it once."""
    return f"postback:{postback_id}"
