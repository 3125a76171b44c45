"""moe_platform.checkpoint"""
