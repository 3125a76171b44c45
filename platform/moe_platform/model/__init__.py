"""moe_platform.model"""
