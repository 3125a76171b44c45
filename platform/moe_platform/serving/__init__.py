"""moe_platform.serving"""
