"""rollout/stats"""
