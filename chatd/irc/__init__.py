"""chatd's IRC front-end (protocol.md, section 12): a second front-end over the same
handlers, hub and store as the msgpack one, not a bridge.

    lines.py       bytes <-> IRC lines, limits (Sans-I/O, irctokens underneath)
    numerics.py    the numeric replies by name
    machine.py     the protocol machine: CAP, registration, SASL, replies (Sans-I/O)
    session.py     the session core: the machine's actions through chatd's handlers
    connection.py  the asyncio transport and the listener
"""
