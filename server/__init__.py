"""crossfield.server"""
