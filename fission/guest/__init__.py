"""The guest agent: what runs inside every microVM, and nothing else.

Stdlib only, Python 3.9 syntax: these files are copied as they are into each image's
``/opt/fission`` (``fission.images.store.AGENT_FILES``) and run there as PID 1's successor
(``agent.py``). Nothing here imports from the rest of fission; the host side of the same
protocol (``fission.agent``) imports ``protocol`` (and the error codes of ``files``) from here,
so both ends share one definition of the wire format.
"""
