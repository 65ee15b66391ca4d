// Alerts, in Azure's own way: an Action Group that mails an admin, log-search alert rules over the records the app
// writes to Application Insights (shared/runlog.py), and a metric alert on events Event Grid had to dead-letter.
// The queries are the .kql files beside this module, loaded when the template is compiled; docs/operations.md shows
// the same text for Logs. Rules are stateful (autoMitigate): one mail when a condition starts, one when it ends.
// Only finished runs are logged, so a run that is retried or resumed and then succeeds raises nothing.

param namePrefix string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the Application Insights component the app writes to.')
param applicationInsightsId string

@description('Resource id of the Event Grid system topic that feeds the blob trigger.')
param systemTopicId string

@description('Email address the alerts go to; empty: the rules exist (and show in the portal) but mail no one.')
param alertEmail string = ''

@description('A finished run alerts when it rejected more than this percentage of the rows it read.')
@minValue(1)
@maxValue(100)
param rejectedPercentThreshold int = 10

@description('An expected destination alerts after this many hours without a successful run (at most 48).')
@minValue(1)
@maxValue(48)
param staleAfterHours int = 48

var runs = loadTextContent('alerts/runs.kql')
var actionGroupIds = empty(alertEmail) ? [] : [actionGroup.id]
var perDestination = [
  {
    name: 'destination'
    operator: 'Include'
    values: ['*']
  }
]

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-${namePrefix}'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'sgconnector'
    enabled: true
    emailReceivers: [
      {
        name: 'connector-admin'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var rules = [
  {
    name: 'run-failed'
    displayName: 'SendGrid connector: a run failed or was refused'
    description: 'A run ended failed or refused. GET /api/runs/{run_id} (docs/operations.md) says why.'
    severity: 1
    query: '${runs}\n${loadTextContent('alerts/failed-runs.kql')}'
    timeAggregation: 'Count'
    metricMeasureColumn: null
    threshold: 0
    dimensions: concat(perDestination, [
      {
        name: 'status'
        operator: 'Include'
        values: ['*']
      }
    ])
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    overrideQueryTimeRange: null
  }
  {
    name: 'rows-rejected'
    displayName: 'SendGrid connector: a run rejected more than ${rejectedPercentThreshold}% of its rows'
    description: 'A finished run rejected more than ${rejectedPercentThreshold}% of the rows it read (bad or missing emails, or contacts SendGrid did not apply). Its rejections CSV names each row.'
    severity: 2
    query: '${runs}\n${loadTextContent('alerts/rejections.kql')}'
    timeAggregation: 'Maximum'
    metricMeasureColumn: 'rejected_percent'
    threshold: rejectedPercentThreshold
    dimensions: perDestination
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    overrideQueryTimeRange: null
  }
  {
    name: 'no-successful-run'
    displayName: 'SendGrid connector: no successful run for ${staleAfterHours} hours'
    description: 'A destination that should run (enabled, or invalid in the destinations file) has had no completed run for more than ${staleAfterHours} hours.'
    severity: 2
    query: '${runs}\n${loadTextContent('alerts/stale-destinations.kql')}'
    timeAggregation: 'Maximum'
    metricMeasureColumn: 'hours_since_success'
    threshold: staleAfterHours
    dimensions: perDestination
    evaluationFrequency: 'PT1H'
    windowSize: 'PT1H'
    overrideQueryTimeRange: 'P2D'
  }
  {
    name: 'poison-message'
    displayName: 'SendGrid connector: a message went to a poison queue'
    description: 'A blob event (webjobs-blobtrigger-poison) or a queued run (<runs queue>-poison) failed on every delivery. docs/operations.md says how to look at it and run it again.'
    severity: 1
    query: loadTextContent('alerts/poison-messages.kql')
    timeAggregation: 'Count'
    metricMeasureColumn: null
    threshold: 0
    dimensions: [
      {
        name: 'queue'
        operator: 'Include'
        values: ['*']
      }
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    overrideQueryTimeRange: null
  }
]

resource logAlerts 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = [for rule in rules: {
  name: '${namePrefix}-${rule.name}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: rule.displayName
    description: rule.description
    severity: rule.severity
    enabled: true
    scopes: [applicationInsightsId]
    evaluationFrequency: rule.evaluationFrequency
    windowSize: rule.windowSize
    overrideQueryTimeRange: rule.overrideQueryTimeRange
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: rule.query
          timeAggregation: rule.timeAggregation
          metricMeasureColumn: rule.metricMeasureColumn
          operator: 'GreaterThan'
          threshold: rule.threshold
          dimensions: rule.dimensions
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: actionGroupIds
    }
  }
}]

resource deadLettered 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-event-dead-lettered'
  location: 'global'
  tags: tags
  properties: {
    description: 'Event Grid could not deliver a BlobCreated event to the app for 24 hours and put it in the dead-letter container. docs/operations.md says how to run that export.'
    severity: 1
    enabled: true
    scopes: [systemTopicId]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'DeadLetteredEvents'
          metricNamespace: 'Microsoft.EventGrid/systemTopics'
          metricName: 'DeadLetteredCount'
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Total'
        }
      ]
    }
    actions: [for id in actionGroupIds: {
      actionGroupId: id
    }]
  }
}
