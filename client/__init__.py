"""crossfield.client"""
