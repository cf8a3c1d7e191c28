"""The workflow aggregate: one ringi request made from a definition, with its steps,
comments and attached documents.

    draft -> in_progress -> approved | rejected | changes_requested (-> resubmit ->
    in_progress); cancelled from any status that is not final."""
