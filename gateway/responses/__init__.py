"""The Responses API (``POST /v1/responses``), served by translating to and from chat completions.

``protocol`` is its request schema, ``input`` turns a request into a chat request, ``output`` turns chat
results into Responses objects and stream events, ``route`` is the endpoint.
"""
