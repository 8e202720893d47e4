"""dualmap_pd: the policy core of dualmap-pd.

Pure decision code shared by the live scheduler and the simulator: block hashing, dual
consistent-hash rings, the cluster view, the cost model, routing policies and the
discrete-event simulator. No network I/O lives here.
"""

__version__ = "0.1.0"
