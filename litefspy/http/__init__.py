"""The h11-on-trio HTTP/1.1 server that the proxy and the metrics endpoint share.

Always imported absolutely (`litefspy.http`), so it never shadows the standard
library's `http`.
"""
