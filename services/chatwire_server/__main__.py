"""`python -m chatwire_server` starts the gRPC server."""

from chatwire_server.server import main

main()
