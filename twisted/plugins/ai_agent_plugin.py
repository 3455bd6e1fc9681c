from twisted.application.service import ServiceMaker

aiAgent = ServiceMaker("twisted-agent", "twisted_agent.tap", "AI voice agent for Asterisk (ARI)", "ai-agent")
