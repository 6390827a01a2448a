"""KV-pool additions for elastic TP: the KV backup stream and its device-to-host copies, radix-cache lookups."""
