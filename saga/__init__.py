"""The workflow completion saga (consumer group `workflow-completion-saga`): started by
a workflow reaching `approved`, it finalizes the documents, notifies the initiator and
the approvers, and syncs to the tenant's external system; on a permanent failure it
compensates in reverse and records `completion_failed` on the workflow (ADR 0011)."""
