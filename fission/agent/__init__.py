"""The host side of the guest agent: its client, the framed channel, file operations, tunnels.

``client.AgentClient`` speaks the protocol of ``fission.guest.protocol`` over the VM's agent
channel; ``channel`` frames and routes replies (throttling what a guest may send),
``file_ops`` streams files both ways and ``tunnel_streams`` carries TCP streams (egress today)
over the same channel. The guest's own code lives in ``fission.guest``.
"""
