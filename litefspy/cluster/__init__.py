"""Who is primary: the node's role and lease as the services see them."""
