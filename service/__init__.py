"""The stateless front: public gRPC API, sessions on the shared store, routing of turns to workers."""
