"""kvtierd placeholder replaced below."""
