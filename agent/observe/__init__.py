"""What the agent tells its operators while it runs: Prometheus metrics, liveness and readiness.

`status` gathers what the capture loops report (the summary line's counters, ring fill, table ages),
`exposition` turns it into Prometheus families, `health` into `/healthz` and `/readyz`, and `server`
serves the three from a thread of the parent process, away from the data plane.
"""
