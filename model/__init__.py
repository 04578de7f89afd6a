"""crossfield.model"""
