"""gRPC serving of a genrec bundle: `create_server` in server/app.py is the composition root."""
