"""`python -m chatwire_server` starts the gRPC server."""

from chatwire_server.server import main

if __name__ == "__main__":
    main()
