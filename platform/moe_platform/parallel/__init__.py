"""moe_platform.parallel"""
