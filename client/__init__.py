"""The backed-up side: one-time keys, the one-shot sshd, the gate, the tunnel,
sending the job and waiting for it. Never imports ``worker``."""
