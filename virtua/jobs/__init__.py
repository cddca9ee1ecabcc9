"""Admin operations as recorded jobs: a plan of named steps, each with its undo, run by
one runner that writes every step to a journal before it starts (virtua.jobs.runner), and
a recovery that undoes what a crashed process left half done (virtua.jobs.recovery).

Below every other layer but the errors: the steps' work and their undo kinds are
registered by the layers that own them (storage operations in virtua.api.ops, the VC
steps in virtua.cluster.manager)."""
