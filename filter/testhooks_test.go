package filter

// expire is ExpireFlows counting what it removed.
func (e *Engine) expire(now int64) int { return len(e.ExpireFlows(now, nil)) }

// rules returns the ruleset new flows are judged by.
func (e *Engine) rules() *Ruleset { return e.policy.Load().rules }
