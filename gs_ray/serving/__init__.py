"""Serving a finished run on Ray Serve: the OpenAI API, the ingress and router, the expert deployment, a client."""
