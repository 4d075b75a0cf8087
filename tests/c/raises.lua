error('raised at once')
