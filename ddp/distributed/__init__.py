"""The process environment, in small modules (import the one you need):

- `env`: which launcher started us, as one frozen `Launch` value (no torch).
- `group`: the process group and device (`DistEnv`), started and torn down.
- `collectives`: the named decisions every rank takes together (`any_rank`, ...).
- `step_sums`: per-step numbers carried by the gradient all-reduce.
- `exit`: exit codes, a process exit that gloo's threads cannot abort, and workers that
  end with their launcher.
- `lost_peer`: a collective that failed because another rank went away, in one line.
"""
