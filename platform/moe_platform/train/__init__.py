"""moe_platform.train"""
