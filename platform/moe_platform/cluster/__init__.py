"""moe_platform.cluster"""
