"""The definition aggregate: a workflow template, a name and ordered steps, each with
the user who decides it."""
